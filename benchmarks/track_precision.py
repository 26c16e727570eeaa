"""Per-frame column positions against the truth: RMS error over the RMS error bar, per species.

``python benchmarks/track_precision.py [SEED ...]``: 20 frames of 512 x 512 SrTiO3 at 200
counts (``stemgpu.simulate_stack``), every column in the image given to the mean's fit (as
``find_atoms`` gives them), then ``track_columns`` with the gain known. Printed for all columns
and for the interior (at least one fitting window from the edge): the outermost rows are
biased by columns outside the image, which no model of the image can see.
"""
import sys

import numpy as np

import stemgpu
from stemgpu.atoms.fit import fit_atoms
from stemgpu.atoms.track import track_columns


def main(seeds):
    for seed in seeds:
        stack, truth = stemgpu.simulate_stack((20, 512, 512), dose=200, seed=seed)
        vis = truth.visible(0, margin=0)
        pos = truth.image_positions(0)[vis]
        mean_fit = fit_atoms(stack.mean(axis=0), pos)
        tracks = track_columns(stack, mean_fit, species=truth.species[vis], counts_per_unit=1)
        ok = np.asarray(mean_fit.status) == 0
        true, species = pos[ok], truth.species[vis][ok]
        err = tracks.positions - true[None]
        w = int(mean_fit.parameters.get("window", 19))
        edge = np.minimum(true, np.array(stack.shape[1:]) - 1 - true).min(axis=1)
        print(f"seed {seed}: window {w}, calibration",
              {k: round(v.ratio, 3) for k, v in tracks.calibration.items()})
        for name in ("Sr", "TiO", "O"):
            for label, sel in (("all", np.ones(len(true), bool)), ("interior", edge >= w)):
                m = (species == name) & sel
                e, s = err[:, m], tracks.position_errors[:, m]
                good = (tracks.status[:, m] == 0) & np.isfinite(e).all(axis=-1)
                ratio = np.sqrt(np.mean(e[good] ** 2)) / np.sqrt(np.mean(s[good] ** 2))
                print(f"  {name:4s} {label:9s} columns {m.sum():5d}  rms/error bar {ratio:.3f}")


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [5])
