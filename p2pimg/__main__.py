from p2pimg.cli.main import main

raise SystemExit(main())
