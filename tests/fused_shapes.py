"""The norm shapes of the model zoo the fused path must fill a GPU on: (channels, height, width) per layer."""


def resnet50_shapes(size: int = 224) -> list[tuple[int, int, int]]:
    """torchvision ResNet-50 at ``size`` px: the stem, and per stage the bottleneck widths and the output."""
    s = size // 2
    shapes = [(64, s, s)]
    for width, blocks_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        s_in = s // 2 if width == 64 else s
        s = s_in // blocks_stride if width != 64 else s_in
        shapes += [(width, s_in, s_in), (width, s, s), (width * 4, s, s)]
    return sorted(set(shapes))


def r50_fpn_shapes(height: int = 800, width: int = 1344) -> list[tuple[int, int, int]]:
    """Mask R-CNN R50-FPN as the paper trains it: backbone at 800x1344, FPN outputs (256 at /4../64), the
    box head's 4 convs on 7x7 RoIs and the mask head's on 14x14 (RoIs count as samples)."""
    out = []
    for c, h, _ in resnet50_shapes(224):
        f = 224 / h
        out.append((c, round(height / f), round(width / f)))
    out += [(256, height // s, width // s) for s in (4, 8, 16, 32, 64)]
    return sorted(set(out + [(256, 7, 7), (256, 14, 14)]))


def cifar_resnet_shapes(size: int = 32, width: int = 16) -> list[tuple[int, int, int]]:
    return [(width, size, size), (2 * width, size // 2, size // 2), (4 * width, size // 4, size // 4)]


DEVICE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NORM_BATCHES = (1, 2, 4, 8, 16, 32)
