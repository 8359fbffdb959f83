from dataserver.cli import main

raise SystemExit(main())
