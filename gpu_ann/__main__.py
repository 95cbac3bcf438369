from gpu_ann.cli import main

raise SystemExit(main())
