from fpqmail.scand.cli import main

raise SystemExit(main())
