// @tus/server with @tus/file-store, as its README sets it up: the benchmark's Node peer.
// node tus_node.mjs <port> <directory>
import { FileStore } from '@tus/file-store'
import { Server } from '@tus/server'

const [port, directory] = process.argv.slice(2)
const server = new Server({ path: '/files', datastore: new FileStore({ directory }) })
server.listen({ host: '127.0.0.1', port: Number(port) })
