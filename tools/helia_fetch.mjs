// A real IPFS client against a p2pimg peer listener: Helia fetches a DAG from it as a trustless
// gateway, and reads the same DAG as one CAR from it; prints what it got as JSON.
//
//   node tools/helia_fetch.mjs GATEWAY_URL ROOT_CID
//
// 1. "broker": a Helia node whose only block broker is the trustless-gateway one and whose only
//    router names GATEWAY_URL walks the DAG from ROOT_CID (raw and dag-cbor blocks), each block
//    fetched through the broker, which refuses a block that does not match its CID. Every block
//    is also hashed here. Listed in walk order (depth-first, links in encoding order).
// 2. "car": GET GATEWAY_URL/ipfs/ROOT_CID?format=car read with @ipld/car's streaming iterator,
//    every block hashed against its CID, then the DAG walked over the CAR's blocks alone: a block
//    missing from it fails; `dfs` says whether the CAR's order is the walk's order.
// 3. "verifiedFetch": @helia/verified-fetch on that Helia node builds its own CAR of the DAG.
//
// Run with Node 22 from tools/helia_node.sh, which installs the packages into .cache/helia/ and
// writes the loader they are imported through.
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const prefix = process.env.P2PIMG_HELIA_PREFIX ?? join(import.meta.dirname, '..', '.cache', 'helia')
const { load } = await import(pathToFileURL(join(prefix, 'load.mjs')).href)

const { createHeliaLight } = await load('helia')
const { trustlessGatewayBlockBroker } = await load('@helia/trustless-gateway-client')
const { fallbackRouter } = await load('@helia/fallback-router')
const { createVerifiedFetch } = await load('@helia/verified-fetch')
const { CarBlockIterator } = await load('@ipld/car/iterator')
const dagCbor = await load('@ipld/dag-cbor')
const { CID } = await load('multiformats/cid')
const { sha256 } = await load('multiformats/hashes/sha2')
const raw = await load('multiformats/codecs/raw')

const [gateway, rootText] = process.argv.slice(2)
const root = CID.parse(rootText)
const TIMEOUT = 120_000

async function verify (cid, bytes) {
  if (cid.multihash.code !== sha256.code) throw new Error(`${cid}: not sha2-256`)
  const digest = await sha256.digest(bytes)
  if (!equal(digest.digest, cid.multihash.digest)) throw new Error(`block ${cid} does not match its CID`)
}

function equal (a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i])
}

// The links of a decoded DAG-CBOR value, in the order its encoding holds them.
function * links (value) {
  const cid = CID.asCID(value)
  if (cid != null) {
    yield cid
  } else if (Array.isArray(value)) {
    for (const item of value) yield * links(item)
  } else if (value != null && typeof value === 'object' && !(value instanceof Uint8Array)) {
    for (const item of Object.values(value)) yield * links(item)
  }
}

// Depth-first from `start`, each block once: the CIDs in the order visited.
async function walk (start, getBlock) {
  const order = []
  const seen = new Set()
  const visit = async (cid) => {
    const key = cid.toString()
    if (seen.has(key)) return
    seen.add(key)
    const bytes = await getBlock(cid)
    await verify(cid, bytes)
    order.push(key)
    if (cid.code === dagCbor.code) {
      for (const child of links(dagCbor.decode(bytes))) await visit(child)
    } else if (cid.code !== raw.code) {
      throw new Error(`${cid}: a codec this walk does not know (${cid.code})`)
    }
  }
  await visit(start)
  return order
}

// The gateway is the only provider of every block. Helia 7 asks "fallback" routers only after
// others, and with no other router its provider search never ends: so the fallback router's
// answer is given by a router of its own (one without the fallback capability).
const fallback = fallbackRouter({ gateways: [gateway], shuffle: false })
const helia = await createHeliaLight({
  blockBrokers: [trustlessGatewayBlockBroker({ allowInsecure: true, allowLocal: true })],
  codecs: [dagCbor, raw], // the light node knows none by default; p2pimg's DAGs use these two
  routers: [{ name: 'p2pimg-peer', findProviders: (cid, options) => fallback.findProviders(cid, options) }]
})
await helia.start()
const result = { gateway, root: root.toString() }
try {
  // Helia's blockstore hands a block out as a stream of pieces.
  result.broker = await walk(root, async (cid) => {
    const pieces = []
    for await (const piece of helia.blockstore.get(cid, { signal: AbortSignal.timeout(TIMEOUT) })) pieces.push(piece)
    return Buffer.concat(pieces)
  })

  const response = await fetch(`${gateway}/ipfs/${root}?format=car`, {
    headers: { accept: 'application/vnd.ipld.car; version=1; order=dfs; dups=n' },
    signal: AbortSignal.timeout(TIMEOUT)
  })
  if (response.status !== 200) throw new Error(`CAR request: ${response.status} ${await response.text()}`)
  const reader = await CarBlockIterator.fromIterable(response.body)
  const inCar = new Map()
  const carOrder = []
  for await (const { cid, bytes } of reader) {
    await verify(cid, bytes)
    if (inCar.has(cid.toString())) throw new Error(`${cid} twice in a dups=n CAR`)
    inCar.set(cid.toString(), bytes)
    carOrder.push(cid.toString())
  }
  const carWalk = await walk(root, async (cid) => {
    const bytes = inCar.get(cid.toString())
    if (bytes == null) throw new Error(`the CAR lacks block ${cid}`)
    return bytes
  })
  result.car = {
    contentType: response.headers.get('content-type'),
    roots: (await reader.getRoots()).map(String),
    blocks: carOrder,
    dfs: carOrder.length === carWalk.length && carOrder.every((c, i) => c === carWalk[i])
  }

  const verifiedFetch = await createVerifiedFetch(helia)
  const built = await verifiedFetch(`ipfs://${root}`, {
    headers: { accept: 'application/vnd.ipld.car' },
    signal: AbortSignal.timeout(TIMEOUT)
  })
  if (built.status !== 200) throw new Error(`verified-fetch: ${built.status} ${await built.text()}`)
  const blocks = []
  for await (const { cid, bytes } of await CarBlockIterator.fromIterable(built.body)) {
    await verify(cid, bytes)
    blocks.push(cid.toString())
  }
  result.verifiedFetch = blocks
  await verifiedFetch.stop()
} finally {
  await helia.stop()
}
process.stdout.write(JSON.stringify(result) + '\n')
