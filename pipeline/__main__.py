import logging
import os
import sys

from pipeline.cli import main

rc = main()
# Everything is recorded and Ray is shut down by now; unloading torch, Ray and MLflow module by
# module at interpreter exit costs another second, so leave at once (after flushing our output).
sys.stdout.flush()
sys.stderr.flush()
logging.shutdown()
os._exit(rc)
