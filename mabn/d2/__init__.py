"""The detectron2 plugin (the only package that imports detectron2); filled by the detectron2 issue."""
