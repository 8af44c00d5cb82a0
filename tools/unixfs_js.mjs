// Add files with the reference JS UnixFS importer at Kubo's `ipfs add --cid-version=1` settings
// and print each root CID, one line per file, in the order given.
//
//   node tools/unixfs_js.mjs [--chunk-size N] [--max-links N] FILE...
//
// Settings: CIDv1, raw leaves, fixed 262144-byte chunks, balanced layout at most 174 links wide,
// a single-chunk file reduced to its leaf, links before data. Run with Node 22 from
// tools/ipfs_node.sh, which installs the packages into .cache/node/ (resolved from there).
import { createReadStream } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const prefix = process.env.P2PIMG_NODE_PREFIX ?? join(import.meta.dirname, '..', '.cache', 'node')
const require = createRequire(join(prefix, 'package.json'))
// The packages are ES modules; resolve each entry point from the prefix, then import it.
const load = async (spec) => import(pathToFileURL(require.resolve(spec)).href)

const args = process.argv.slice(2)
let chunkSize = 262144
let maxLinks = 174
const files = []
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--chunk-size') chunkSize = Number(args[++i])
  else if (args[i] === '--max-links') maxLinks = Number(args[++i])
  else files.push(args[i])
}

const { importer } = await load('ipfs-unixfs-importer')
const { fixedSize } = await load('ipfs-unixfs-importer/chunker')
const { balanced } = await load('ipfs-unixfs-importer/layout')
const { BlackHoleBlockstore } = await load('blockstore-core/black-hole')

for (const file of files) {
  const source = [{ content: createReadStream(file, { highWaterMark: 1 << 20 }) }]
  const options = {
    cidVersion: 1,
    rawLeaves: true,
    reduceSingleLeafToSelf: true,
    fieldOrder: 'links-first',
    chunker: fixedSize({ chunkSize }),
    layout: balanced({ maxChildrenPerNode: maxLinks }),
    wrapWithDirectory: false
  }
  let root
  for await (const entry of importer(source, new BlackHoleBlockstore(), options)) root = entry.cid
  process.stdout.write(`${root.toString()}\n`)
}
