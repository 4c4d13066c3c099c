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

# a face of the tiny world ("real" preset: lr 0.1, weight decay 1e-10, 400 steps; K 10,000, or all of the
# tiny space's 250 when --dim is not given; lr 0.3 here, as the tiny space records for it: at 0.1 its
# larger coefficients have not converged in 400 steps)
$PY inversion/invert.py --space files/tiny/space --base files/tiny/base \
    --image inversion/images/face.png --mask_path inversion/images/face_mask.png \
    --epochs "${REAL_EPOCHS:-400}" --lr 3e-1 --weight_decay 1e-10 \
    --diffusers_format --save_name "$OUT/face"

# an out-of-distribution painting ("ood" preset: K 1000, lr 1, no weight decay, 800 steps; lr 0.1 here, as the
# tiny space records for it: 1 is sized for SD1.5's space, and on the tiny space's smaller coefficients it
# walks off to noise; `w2w invert --preset ood` picks 0.1 by itself)
$PY inversion/invert.py --space files/tiny/space --base files/tiny/base \
    --image inversion/images/drawing.png --mask_path inversion/images/drawing_mask.png \
    --epochs "${OOD_EPOCHS:-800}" --lr 1e-1 --weight_decay 0 \
    --diffusers_format --save_name "$OUT/drawing"

# Stable Diffusion 1.5 with the released w2w files (downloaded into files/; they are pickles, so
# --trust_pickle only if you trust their source; or convert once with `w2w import-official` and pass --space):
# $PY inversion/invert.py --base stablediffusionapi/realistic-vision-v51 \
#     --mean_path files/mean.pt --std_path files/std.pt --v_path files/V.pt \
#     --dim_path files/weight_dimensions.pt --trust_pickle \
#     --image my_photo.jpg --mask_path my_photo_mask.png \
#     --epochs 400 --lr 1e-1 --weight_decay 1e-10 --dim 10000 --device cuda:0 \
#     --diffusers_format --save_name outputs/inversion/real1
