"""The demo's side-by-side crops (bicubic | FP | baseline | ODM) of one val photo."""

# Side-by-side crops: CROP x CROP HR pixels, nearest-upscaled ZOOM times, a LABEL_H px label strip on top of each
# panel, GAP px between panels. Width of comparison_w<b>.png = 4 * CROP * ZOOM + 3 * GAP.
CROP = 64
ZOOM = 4
LABEL_H = 24
GAP = 4
PANELS = 4


def crop_box(gt_bgr, size=CROP):
    """Top-left corner of the ``size`` x ``size`` window with the most HR gradient energy (fixed by the HR image
    alone, never by the results)."""
    import cv2
    import numpy as np
    y = cv2.cvtColor(gt_bgr, cv2.COLOR_BGR2GRAY).astype(np.float64)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    integral = cv2.integral(energy)
    h, w = energy.shape
    size = min(size, h, w)
    best, best_pos = -1.0, (0, 0)
    for top in range(0, h - size + 1, 4):
        for left in range(0, w - size + 1, 4):
            s = (integral[top + size, left + size] - integral[top, left + size] - integral[top + size, left]
                 + integral[top, left])
            if s > best:
                best, best_pos = s, (top, left)
    return best_pos


def comparison_png(path, panels, box, size=CROP):
    """Write panels ``[(label, uint8 BGR image)]`` side by side: crop at ``box``, nearest x ZOOM, label strip."""
    import cv2
    import numpy as np
    top, left = box
    tiles = []
    for label, img in panels:
        crop = img[top:top + size, left:left + size]
        crop = cv2.resize(crop, (crop.shape[1] * ZOOM, crop.shape[0] * ZOOM), interpolation=cv2.INTER_NEAREST)
        strip = np.full((LABEL_H, crop.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, label, (4, LABEL_H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([strip, crop], axis=0))
    gap = np.full((tiles[0].shape[0], GAP, 3), 255, np.uint8)
    row = [tiles[0]]
    for t in tiles[1:]:
        row += [gap, t]
    cv2.imwrite(path, np.concatenate(row, axis=1))
