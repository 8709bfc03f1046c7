"""ResNets built through the norm registry; filled by the ImageNet training issue."""
