from portalloc.adapters.entry import main

raise SystemExit(main())
