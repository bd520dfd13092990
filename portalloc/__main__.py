from portalloc.adapters.cli import main

raise SystemExit(main())
