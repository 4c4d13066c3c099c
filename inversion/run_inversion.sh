#!/usr/bin/env bash
# Invert the shipped example images with the tiny world (run from anywhere, with files/tiny/ in place).
# Writes $OUT/{face,drawing}/w2wmodel.safetensors and unet/ (OUT default: outputs/inversion).
# Shorter runs to try it: REAL_EPOCHS=50 OOD_EPOCHS=50 inversion/run_inversion.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's .venv (make demo and make test create it) comes first, so no activation is needed
if [[ -x .venv/bin/python ]]; then PATH="$PWD/.venv/bin:$PATH"; fi
PY=${PY:-python}
OUT=${OUT:-outputs/inversion}

# Each run takes its preset's settings as the tiny space records them (`w2w info files/tiny/space`), the
# paper's otherwise: the tiny space's coefficients are on another scale than SD1.5's, so it records the
# learning rates that suit it. `--epochs` is passed only when REAL_EPOCHS or OOD_EPOCHS is set.

# a face of the tiny world (the "real" preset)
$PY inversion/invert.py --space files/tiny/space --base files/tiny/base \
    --image inversion/images/face.png --mask_path inversion/images/face_mask.png \
    --preset real ${REAL_EPOCHS:+--epochs "$REAL_EPOCHS"} \
    --diffusers_format --save_name "$OUT/face"

# an out-of-distribution painting (the "ood" preset)
$PY inversion/invert.py --space files/tiny/space --base files/tiny/base \
    --image inversion/images/drawing.png --mask_path inversion/images/drawing_mask.png \
    --preset ood ${OOD_EPOCHS:+--epochs "$OOD_EPOCHS"} \
    --diffusers_format --save_name "$OUT/drawing"

# Stable Diffusion 1.5 with the released w2w files (downloaded into files/; they are pickles, so
# --trust_pickle only if you trust their source; or convert once with `w2w import-official` and pass --space);
# the released files record no settings, so the real preset is the original's:
# $PY inversion/invert.py --base stablediffusionapi/realistic-vision-v51 \
#     --mean_path files/mean.pt --std_path files/std.pt --v_path files/V.pt \
#     --dim_path files/weight_dimensions.pt --trust_pickle \
#     --image my_photo.jpg --mask_path my_photo_mask.png --device cuda:0 \
#     --diffusers_format --save_name outputs/inversion/real1
