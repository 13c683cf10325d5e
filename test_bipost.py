"""bipost tests. CPU by default: `python -m pytest -q test_bipost.py`. GPU-only tests: `-m gpu`."""
import os, sys, json, math, subprocess
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

# ---- configurator ----

# ---- data ----

# ---- objectives ----

# ---- kernels ----

# ---- selector ----

# ---- training ----

# ---- reliability ----
