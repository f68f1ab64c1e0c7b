from llmux.cli import main

raise SystemExit(main())
