"""A swarm simulator that runs the real scheduling core at scale: `python -m bench.sim`.

N simulated nodes (default 1,000), each with its own `Scheduler` and `BlobSchedule`
(`p2pimg/fetch/schedule.py`), pull the same image at once over a discrete-time network model
(`net.py`: per-node down and up links, LAN and origin latency, one origin uplink shared by all,
an optional cap per connection); `world.py` plays the engine's part for every node. See
`cli.py` for the options and the figures it reports.
"""
