"""The console in a real browser: Debian's Chromium, headless, driven by Playwright, against
the real server. Without /usr/bin/chromium only this module skips (CI installs it and
fails instead of skipping)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CONSOLE_TOKEN, TUS, Server

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: .ci/run must apt-get install chromium")
    pytest.skip(
        f"{CHROMIUM} not found (apt-get install chromium to run the browser tests)", allow_module_level=True
    )

from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = CONSOLE_TOKEN
ARTIFACTS = Path(__file__).parent / "artifacts"
MiB = 1 << 20
TIMEOUT_MS = 60_000  #: generous: two cores shared with other work
#: Bounds what a cut request can have had in flight (socket buffers) plus request heads.
IN_FLIGHT = 1 * MiB


class CountingProxy:
    """A TCP relay in front of the server: counts every byte the browser sends to it and
    paces them to `rate` bytes/s, so that a test can go offline mid-upload."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.upstream = 0  #: bytes relayed to the server, request heads included
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        # a small window towards the browser: little is in flight when a request is cut
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                browser, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [browser, server]
            threading.Thread(target=self._relay, args=(browser, server, True), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, browser, False), daemon=True).start()

    def _relay(self, source: socket.socket, target: socket.socket, upstream: bool) -> None:
        due = time.monotonic()
        try:
            while data := source.recv(16384):
                if upstream:  # pace: a token bucket of `rate` bytes per second
                    due = max(due, time.monotonic()) + len(data) / self.rate
                    time.sleep(max(0.0, due - time.monotonic()))
                target.sendall(data)
                if upstream:
                    with self._lock:
                        self.upstream += len(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def proxy(console: Server) -> Iterator[CountingProxy]:
    relay = CountingProxy(console.port, rate=3 * MiB)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
async def chromium(console: Server) -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, for the module; Playwright gives it a fresh temporary
    profile (--user-data-dir). Closed before the server stops, so its streams end first."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        await browser.close()


@contextlib.asynccontextmanager
async def fresh_page(browser: Browser) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page in a context of its own (empty storage, its own network switch), and the
    console errors it logs."""
    context = await browser.new_context(viewport={"width": 1100, "height": 1300})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    try:
        yield page, errors
    finally:
        await context.close()


@pytest.fixture
async def page(chromium: Browser) -> AsyncIterator[tuple[Page, list[str]]]:
    async with fresh_page(chromium) as opened:
        yield opened


async def open_console(page: Page, base_url: str, fragment: str = "") -> None:
    await page.goto(f"{base_url}/console/#token={TOKEN}{fragment}")
    await page.wait_for_selector("#connection[data-state=live]")


def random_file(tmp_path: Path, size: int, name: str = "clip.bin") -> tuple[Path, str]:
    path = tmp_path / name
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def stored_sha256(server: Server, upload_url: str) -> str:
    """The sha256 of the bytes in the server's storage (not what any client says)."""
    unsigned = upload_url.split("?", 1)[0]  # with auth on, upload URLs carry a signature
    return hashlib.sha256(server.data_file(unsigned).read_bytes()).hexdigest()


async def upload_through_page(page: Page, path: Path, protocol: str) -> None:
    await page.set_input_files("#file", str(path))
    await page.check(f"input[name=protocol][value={protocol}]")
    await page.click("#start")


async def until_confirmed(tab: Page, size: int) -> None:
    """Wait until the page's upload has `size` bytes confirmed by the server."""
    script = "size => Number(document.querySelector('#try-progress').dataset.confirmed) >= size"
    await tab.wait_for_function(script, arg=size)


async def test_page_loads_without_console_errors(console: Server, page: tuple[Page, list[str]]) -> None:
    tab, errors = page
    await open_console(tab, console.url)
    await tab.wait_for_selector("#viewer:has-text('operator')")
    assert "token" not in tab.url  # taken from the fragment, kept in sessionStorage only
    assert await tab.evaluate("sessionStorage.getItem('uploadsrv.console.token')") == TOKEN
    assert await tab.is_hidden("#login")
    assert errors == []


async def test_a_wrong_token_asks_for_the_right_one(console: Server, page: tuple[Page, list[str]]) -> None:
    tab, _ = page
    await tab.goto(f"{console.url}/console/#token=wrong")
    await tab.wait_for_selector("#connection[data-state=denied]")
    await tab.fill("#token-input", TOKEN)
    await tab.press("#token-input", "Enter")  # keyboard only
    await tab.wait_for_selector("#connection[data-state=live]")
    assert await tab.is_hidden("#login")


@pytest.mark.parametrize("protocol", ["tus", "chunks"])
async def test_a_file_uploaded_through_the_page_arrives_intact(
    console: Server, page: tuple[Page, list[str]], tmp_path: Path, protocol: str
) -> None:
    tab, errors = page
    path, digest = random_file(tmp_path, 3 * MiB + 12345)
    await open_console(tab, console.url)
    await upload_through_page(tab, path, protocol)
    await tab.wait_for_selector("#try-result[data-match=true]")
    upload_url = await tab.get_attribute("#try-result", "data-url")
    assert upload_url is not None
    assert stored_sha256(console, upload_url) == digest
    # the session shows up in the live table, complete
    row = f"#sessions tr[data-id='{Server.upload_id(upload_url)}'] .state"
    await tab.wait_for_selector(f"{row}[data-state=complete]")
    assert errors == []


async def test_going_offline_mid_upload_resumes_without_starting_over(
    console: Server, proxy: CountingProxy, page: tuple[Page, list[str]], tmp_path: Path
) -> None:
    tab, _ = page
    size = 12 * MiB
    path, digest = random_file(tmp_path, size)
    await open_console(tab, proxy.url)
    await upload_through_page(tab, path, "tus")
    # the first PATCH (4 MiB) is confirmed, the next one is on its way
    await until_confirmed(tab, 4 * MiB)
    await tab.context.set_offline(True)
    await tab.wait_for_selector("#try-status[data-state=offline]")
    upload_url = await tab.evaluate("JSON.parse(localStorage.getItem('uploadsrv.console.uploads'))")
    (entry,) = upload_url.values()
    async with httpx.AsyncClient(timeout=30) as client:
        head = await client.head(entry["url"].replace(proxy.url, console.url), headers=TUS)
    stored_when_offline = int(head.headers["upload-offset"])
    relayed_when_offline = proxy.upstream
    await tab.context.set_offline(False)
    await tab.wait_for_selector("#try-result[data-match=true]")
    figures = {
        "file_size": size,
        "stored_when_offline": stored_when_offline,
        "relayed_when_offline": relayed_when_offline,
        "relayed_in_all": proxy.upstream,  # request heads and the console's own requests included
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "offline-resume.json").write_text(json.dumps(figures, indent=2))
    print("offline/online resume:", figures)
    assert 4 * MiB <= stored_when_offline < size
    assert stored_sha256(console, entry["url"]) == digest
    # Starting over would send the stored bytes again: size + stored_when_offline at least.
    # What goes twice is what was in flight when the network went (the relay and the
    # browser's socket buffers: small, as the relay's receive buffer is), and request heads.
    assert size <= proxy.upstream < size + min(stored_when_offline, IN_FLIGHT)


async def test_a_reload_mid_upload_resumes_from_the_servers_offset(
    console: Server, proxy: CountingProxy, page: tuple[Page, list[str]], tmp_path: Path
) -> None:
    tab, _ = page
    size = 8 * MiB
    path, digest = random_file(tmp_path, size)
    await open_console(tab, proxy.url)
    await upload_through_page(tab, path, "tus")
    await until_confirmed(tab, 4 * MiB)
    await tab.reload()
    await tab.wait_for_selector("#resume-hint:not([hidden])")
    await tab.set_input_files("#file", str(path))
    await tab.wait_for_selector("#try-status:has-text('unfinished tus upload')")
    await tab.click("#start")
    await tab.wait_for_selector("#try-result[data-match=true]")
    resumed_from = int(await tab.get_attribute("#try-result", "data-resumed-from") or 0)
    assert 4 * MiB <= resumed_from < size
    upload_url = await tab.get_attribute("#try-result", "data-url")
    assert upload_url is not None
    assert stored_sha256(console, upload_url.replace(proxy.url, console.url)) == digest
    assert size <= proxy.upstream < size + min(resumed_from, IN_FLIGHT)


async def test_a_chunk_session_from_another_client_fills_the_map(
    console: Server, page: tuple[Page, list[str]]
) -> None:
    tab, errors = page
    chunk = 64 << 10
    data = os.urandom(6 * chunk)
    cell = "#chunk-map [data-chunk='{}']"
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            console.url + "/chunks/",
            json={"size": len(data), "chunk_size": chunk, "metadata": {"filename": "from-a-phone.mov"}},
        )
        session = response.json()
        await open_console(tab, console.url)
        await tab.evaluate(f"location.hash = 'session/{session['id']}'")
        await tab.wait_for_selector(cell.format(6))

        async def put(number: int, body: bytes | AsyncIterator[bytes] | None = None) -> httpx.Response:
            url = session["chunk_url_template"].replace("{n}", str(number))
            return await client.put(
                url, content=data[(number - 1) * chunk : number * chunk] if body is None else body
            )

        # chunk 4 is held open halfway while others land: the map shows it being written
        release = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield data[3 * chunk : 3 * chunk + chunk // 2]
            await release.wait()
            yield data[3 * chunk + chunk // 2 : 4 * chunk]

        held = asyncio.create_task(put(4, slow_body()))
        await until_writing(client, console, session["id"], [4])
        for stored, number in enumerate([3, 1, 6, 2], start=1):
            assert (await put(number)).status_code == 201
            await tab.wait_for_selector(cell.format(number) + ".stored")
            await tab.wait_for_selector(f"#chunk-map[data-stored='{stored}']")
        await tab.wait_for_selector(cell.format(4) + ".writing")
        assert await tab.get_attribute(cell.format(5), "class") == "cell"  # missing
        release.set()
        assert (await held).status_code == 201
        await tab.wait_for_selector(cell.format(4) + ".stored")
        assert (await put(5)).status_code == 201
        await tab.wait_for_selector("#chunk-map[data-stored='6']")
        assert (await client.post(session["complete_url"])).status_code == 200
    await tab.wait_for_selector("#detail[data-state=complete]")
    await tab.wait_for_selector(f"#sessions tr[data-id='{session['id']}'] .state[data-state=complete]")
    await tab.wait_for_selector("#detail-download:not([hidden])")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "console-live.png"
    await tab.screenshot(path=str(shot), full_page=True)
    print("screenshot of the live view:", shot)
    # on a phone's screen the page fits its width (the table scrolls inside its own box)
    await tab.set_viewport_size({"width": 390, "height": 844})
    assert await tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await tab.screenshot(path=str(ARTIFACTS / "console-phone.png"), full_page=True)
    assert errors == []


async def until_writing(
    client: httpx.AsyncClient, server: Server, session_id: str, chunks: list[int]
) -> None:
    """Wait until the server reports exactly `chunks` being written (their locks taken)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    url = server.url + f"/console/api/sessions/{session_id}"
    while (await client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})).json()["session"][
        "writing"
    ] != chunks:
        assert time.monotonic() < deadline, f"chunks {chunks} never became busy"
        await asyncio.sleep(0.02)


async def test_deleting_from_the_page_asks_first(console: Server, page: tuple[Page, list[str]]) -> None:
    tab, errors = page
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(console.url + "/files/", headers={**TUS, "Upload-Length": "10"})
        upload_url = response.headers["location"]
        upload_id = Server.upload_id(upload_url)
        await open_console(tab, console.url)
        await tab.click(f"#sessions tr[data-id='{upload_id}'] a")
        await tab.wait_for_selector("#detail:not([hidden])")
        await tab.click("#detail-delete")
        await tab.click("#confirm-delete button[value=cancel]")
        assert (await client.head(upload_url, headers=TUS)).status_code == 200
        await tab.click("#detail-delete")
        await tab.click("#confirm-delete button[value=delete]")
        await tab.wait_for_selector("#detail[data-state=terminated]")
        assert (await client.head(upload_url, headers=TUS)).status_code == 404
    assert errors == []


async def test_with_auth_on_a_user_signs_in_and_uploads_as_themselves(
    start_server: Callable[..., Server], chromium: Browser, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token alice\nbob-token bob\n")
    server = start_server("--console", "--auth", "bearer", "--tokens-file", str(tokens))
    async with httpx.AsyncClient(timeout=30) as client:
        headers = {**TUS, "Upload-Length": "5", "Authorization": "Bearer bob-token"}
        assert (await client.post(server.files, headers=headers)).status_code == 201
    async with fresh_page(chromium) as (tab, errors):
        await sign_in_and_upload(server, tab, errors, tmp_path)


async def sign_in_and_upload(server: Server, tab: Page, errors: list[str], tmp_path: Path) -> None:
    await tab.goto(f"{server.url}/console/")
    await tab.wait_for_selector("#login:not([hidden])")
    await tab.fill("#token-input", "alice-token")
    await tab.press("#token-input", "Enter")
    await tab.wait_for_selector("#connection[data-state=live]")
    await tab.wait_for_selector("#viewer:has-text('signed in as alice')")
    assert await tab.is_visible("#empty")  # bob's upload is not alice's to see
    path, digest = random_file(tmp_path, MiB)
    await upload_through_page(tab, path, "chunks")
    await tab.wait_for_selector("#try-result[data-match=true]")
    upload_url = await tab.get_attribute("#try-result", "data-url")
    assert upload_url is not None
    assert stored_sha256(server, upload_url) == digest
    await tab.wait_for_selector("#sessions tbody tr >> nth=0")
    assert await tab.locator("#sessions tbody tr").count() == 1
    assert await tab.text_content("#sessions tbody tr td:nth-child(2)") == "alice"
    assert [e for e in errors if "401" not in e] == []  # the first try without a token is refused
