"""The swarm's decisions, with no I/O and no clock of their own (time is passed in).

The daemon drives these classes with real sockets, the simulator with a bandwidth
model, and the tests directly. `bitfield` holds chunk sets, `picker` chooses which
chunk, `peers` ranks and penalises neighbours, `scheduler` ties them together.
"""
