"""`python -m pypnm` runs the same CLI as the `pypnm` console script."""

from pypnm.cli import main

raise SystemExit(main())
