// Upload a file to uploadsrv with tus-js-client, the way a web app would.
//   node upload.mjs ENDPOINT FILE PROTOCOL MODE
// PROTOCOL: tus-v1 | ietf-draft-03 | ietf-draft-05
// MODE: plain | parallel (parallelUploads: 3) | abort-resume (abort a third in, resume with a new Upload)
// Prints one JSON line: {"url": ..., "abortedAt": ..., "resumedFrom": ...}
// Env: UPLOAD_HEADERS (JSON object, e.g. an Authorization header) goes with every request;
// RESUME_HEADERS replaces it for the resumed upload of abort-resume (a client without its token).
import fs from 'node:fs'
import { Upload } from 'tus-js-client'

const [endpoint, file, protocol, mode] = process.argv.slice(2)
const data = fs.readFileSync(file)
const headers = JSON.parse(process.env.UPLOAD_HEADERS || '{}')
const resumeHeaders = process.env.RESUME_HEADERS ? JSON.parse(process.env.RESUME_HEADERS) : headers

function upload(options, onChunk) {
  return new Promise((resolve, reject) => {
    const chunks = []
    const task = new Upload(data, {
      endpoint,
      protocol,
      retryDelays: null,
      headers,
      metadata: { filename: 'clip.bin', filetype: 'application/octet-stream' },
      ...options,
      onChunkComplete: (size, accepted) => {
        chunks.push(accepted - size)
        if (onChunk && onChunk(accepted, task)) resolve({ url: task.url, abortedAt: accepted, starts: chunks })
      },
      onSuccess: () => resolve({ url: task.url, starts: chunks }),
      onError: reject,
    })
    task.start()
  })
}

try {
  let result
  if (mode === 'plain') {
    result = await upload({ chunkSize: 1024 * 1024 })
  } else if (mode === 'parallel') {
    result = await upload({ chunkSize: 512 * 1024, parallelUploads: 3 })
  } else if (mode === 'abort-resume') {
    const first = await upload({ chunkSize: 256 * 1024 }, (accepted, task) => {
      if (accepted < data.length / 3) return false
      task.abort()
      return true
    })
    const second = await upload({ chunkSize: 256 * 1024, uploadUrl: first.url, headers: resumeHeaders })
    result = { url: second.url, abortedAt: first.abortedAt, resumedFrom: second.starts[0] }
  } else {
    throw new Error(`unknown mode ${mode}`)
  }
  console.log(JSON.stringify(result))
} catch (error) {
  console.error(String(error))
  process.exit(1)
}
