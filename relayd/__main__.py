from .cli import relayd_main

raise SystemExit(relayd_main())
