"""The ledger: leases.json, its lock and its index in the state directory.

store.py is the store (lock, load, save, quarantine); codec.py the file's bytes and
the lock-free read. Nothing is imported here: the read path imports codec.py alone.
"""
