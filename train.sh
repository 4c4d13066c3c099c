#!/usr/bin/env bash
# Dreambooth LoRA of one identity, as in the w2w paper (Sec. 3.1 and App. A).
#   bash train.sh                      the tiny world (CPU, 2 minutes): identity 000000 of data/faces
#   bash train.sh sd15 IMAGES OUT      Stable Diffusion 1.5 (realistic-vision), the paper's command (GPU)
# Many identities at once: w2w train-identities --help
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,5s/^# \{0,1\}//p' "$0"; exit 0; fi
# the project's .venv (make demo and make test create it) comes first, so no activation is needed
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -x "$root/.venv/bin/python" ]]; then PATH="$root/.venv/bin:$PATH"; fi

if [[ "${1:-tiny}" == "sd15" ]]; then
  instance_dir=${2:?usage: bash train.sh sd15 INSTANCE_IMAGES_DIR OUTPUT_DIR}
  output_dir=${3:?usage: bash train.sh sd15 INSTANCE_IMAGES_DIR OUTPUT_DIR}
  accelerate launch train_dreambooth.py \
    --pretrained_model_name_or_path stablediffusionapi/realistic-vision-v51 \
    --instance_data_dir "$instance_dir" \
    --output_dir "$output_dir" \
    --instance_prompt "sks person" \
    --class_prompt "person" \
    --with_prior_preservation --prior_loss_weight 1.0 \
    --class_data_dir class_images/person --num_class_images 200 \
    --resolution 512 --train_batch_size 1 \
    --learning_rate 1e-4 --lr_scheduler constant --max_train_steps 800 \
    --use_lora --lora_r 1 --lora_alpha 27 \
    --gradient_accumulation_steps 1 --mixed_precision fp16 \
    --seed 0
else
  # FACES, OUT, MAX_TRAIN_STEPS and NUM_CLASS_IMAGES may be set to try it quickly (the tests do)
  faces=${FACES:-data/faces} out=${OUT:-outputs}
  [[ -d "$faces/celeba_generated/000000" ]] || python -m lora_w2w.tiny.synthetic --out "$faces" --num 4
  # without a GPU accelerate would run one thread (OMP_NUM_THREADS=1): give it the cores
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "${OMP_NUM_THREADS:-$(nproc)}" \
    train_dreambooth.py \
    --pretrained_model_name_or_path files/tiny/base \
    --instance_data_dir "$faces/celeba_generated/000000" \
    --output_dir "$out/loras/000000" \
    --class_data_dir "$out/class_images" --num_class_images "${NUM_CLASS_IMAGES:-200}" \
    --learning_rate 3e-3 --max_train_steps "${MAX_TRAIN_STEPS:-800}" --class_inference_steps 25 \
    --lora_r 4 --lora_alpha 108 \
    --seed 0   # the tiny world's recipe (LORA_RECIPE, files/tiny/README.md)
fi
