from overtok.cli import main

raise SystemExit(main())
