#!/usr/bin/env python
"""Mask R-CNN R50-FPN on COCO through the detectron2 plugin in mabn/d2/ (not built yet)."""

import sys

if __name__ == "__main__":
    sys.exit("train_coco.py is not implemented yet (tracked by the detectron2 plugin issue).")
