"""The ledger: leases.json in the state directory, one job per module.

- format.py   the file's raw shapes (TypedDicts), its version, the migrations
- codec.py    bytes <-> state: a lease to and from its raw form, a document to the
              state, the lease rules on load and before a save, the CRC
- index.py    the per-user index of a large ledger, its leases parsed when asked for
- encoder.py  the bytes every save writes, with their index (unchanged leases of an
              indexed file copied as they were)
- store.py    Ledger: the lock, load, save, quarantine; and the reads without the lock
              (read_lease, one lease; read_every_lease, for completion): the one
              module that opens the ledger's files (tests/test_ledger_ownership.py)

Nothing is imported here: the read path (`portalloc env`) imports format.py, codec.py
and store.py for read_lease, never the index, the encoder, contextlib or filelock (the
store imports them where it locks, loads through the index or saves).
"""
