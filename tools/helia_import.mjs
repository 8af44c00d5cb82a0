// Import a CAR file into an offline Helia node and pin its root recursively, as
// `ipfs dag import --pin-roots` does: that needs every block of the DAG in the CAR, each one
// checked against its CID by Helia. Prints {"roots": [...], "pinned": N} (N: blocks pinned).
// Usage: node tools/helia_import.mjs FILE.car   (packages from .cache/helia: tools/helia_node.sh)
import { createReadStream } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const loader = process.env.P2PIMG_HELIA_LOADER ?? join(here, '..', '.cache', 'helia', 'load.mjs')
const { load } = await import(pathToFileURL(loader).href)
const { createHeliaLight } = await load('helia')
const { car } = await load('@helia/car')
const { CarReader } = await load('@ipld/car')
const dagCbor = await load('@ipld/dag-cbor')
const raw = await load('multiformats/codecs/raw')

// No block brokers and no routers: whatever the CAR lacks cannot be fetched from anywhere.
const helia = await createHeliaLight({ codecs: [dagCbor, raw], blockBrokers: [], routers: [] })
await helia.start()
try {
  const reader = await CarReader.fromIterable(createReadStream(process.argv[2]))
  const roots = await reader.getRoots()
  await car(helia).import(reader)
  let pinned = 0
  for await (const _cid of helia.pins.add(roots[0], { signal: AbortSignal.timeout(60000) })) pinned++
  console.log(JSON.stringify({ roots: roots.map(String), pinned }))
} finally {
  await helia.stop()
}
