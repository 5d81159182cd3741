"""`python -m dualtask.report RUN`: a run's report.html rebuilt from its files alone."""
import sys

from dualtask.report.build import main

sys.exit(main())
