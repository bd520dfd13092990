from portalloc.adapters.entry import run

run()
