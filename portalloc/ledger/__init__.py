"""The ledger: leases.json in the state directory, one job per module.

- format.py   the file's raw shapes (TypedDicts), its version, the migrations
- codec.py    bytes <-> state: a lease to and from its raw form, a document to the
              state, the lease rules on load and before a save, the CRC; and
              read_lease, one lease read without the lock
- index.py    the per-user index of a large ledger, its leases parsed when asked for
- encoder.py  the bytes every save writes, with their index (unchanged leases of an
              indexed file copied as they were)
- store.py    Ledger: the lock, load, save, quarantine; the one module that opens the
              ledger's files (but for the reads without the lock: read_lease, and
              portalloc.reading.leases for completion)

Nothing is imported here: the read path (`portalloc env`) imports codec.py and
format.py alone, never the store, the index, the encoder or filelock.
"""
