import os
import sys

# Benchmarks run against the cnnext that is installed (or built in place at the repo root).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
