"""Load tests and benchmarks for uploadsrv; they drive a server over HTTP like real clients."""
