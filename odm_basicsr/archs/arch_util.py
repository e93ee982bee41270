"""Helpers shared by the plugin's FP archs (not registered; the file name avoids the ``_arch.py`` suffix)."""
import torch

SUPPORTED_SCALES = (2, 3, 4)


class PixelRangeMixin:
    """EDSR-PyTorch's pixel convention for BasicSR inputs: [0, 1] images become ``(x - mean) * img_range``
    (features on a 0-255 scale, as the SR-quantization papers train them) and the output is mapped back."""

    def setup_pixel_range(self, upscale, img_range, rgb_mean, num_in_ch, num_out_ch):
        """Validate ``upscale`` (2, 3 or 4) and register the optional mean as a non-persistent buffer."""
        name = type(self).__name__
        if upscale not in SUPPORTED_SCALES:
            raise ValueError(f'{name} supports upscale 2, 3 or 4, got upscale={upscale!r}.')
        self.upscale = upscale
        self.img_range = img_range
        self.mean = None
        if rgb_mean is not None:
            if len(rgb_mean) != num_in_ch or num_in_ch != num_out_ch:
                raise ValueError(f'rgb_mean needs num_in_ch == num_out_ch == len(rgb_mean), got {len(rgb_mean)} '
                                 f'means for {num_in_ch} -> {num_out_ch} channels.')
            del self.mean
            mean = torch.tensor(rgb_mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer('mean', mean, persistent=False)

    def to_pixel_range(self, x):
        return x * self.img_range if self.mean is None else (x - self.mean) * self.img_range

    def from_pixel_range(self, out):
        return out / self.img_range if self.mean is None else out / self.img_range + self.mean


def pad_to_window(x, window):
    """Pad an (N, C, H, W) tensor at the bottom and right to multiples of ``window`` (windowed archs: SwinIR).

    Reflection where the image is larger than the padding, else replication. ``window`` None or 0: ``x`` itself.
    Crop the output back to ``H * scale, W * scale``.
    """
    if not window:
        return x
    h, w = x.shape[-2:]
    ph, pw = (-h) % window, (-w) % window
    if not (ph or pw):
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode='reflect' if ph < h and pw < w else 'replicate')
