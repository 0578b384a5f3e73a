"""pipeline.data: shapes, splits, normalization, subsets, batching and the file readers."""
from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import data
from pipeline.config import DatasetConfig
from pipeline.errors import CONFIG_ERROR if False else ConfigError  # noqa: E501  (plain import below)
