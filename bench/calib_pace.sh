#!/usr/bin/env bash
# Calibration at llama.cpp's pace (issue 23 item 5): matq's calibrated quantize beside llama-imatrix +
# llama-quantize on the same text and token count, one after the other in one run, wall and CPU
# seconds of each (GNU time), then the ratios of the wall clocks. Run it alone: the machine's other
# load counts in the wall clock.
#   bench/calib_pace.sh HF_DIR F32_GGUF TEXT [TOKENS=8192] [THREADS=2]
# HF_DIR, F32_GGUF, TEXT: what bench/quality.py --workdir W --keep leaves in W (smollm2-hf,
# smollm2-F32.gguf, calibration.txt).
set -euo pipefail
hf="$1" f32="$2" text="$3" tokens="${4:-8192}" threads="${5:-2}"
here="$(cd "$(dirname "$0")" && pwd)"
bin="$("$here/llama_tools.sh")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
wall=0
t() {  # label, command...: "label: wall W s, CPU C s"; the wall seconds in $wall
    local label="$1"; shift
    /usr/bin/time -f "%e %U %S" -o "$work/t" "$@" >"$work/log" 2>&1 || { tail -20 "$work/log"; exit 1; }
    read -r wall u s <"$work/t"
    printf '%-62s wall %7.1f s, CPU %7.1f s\n' "$label" "$wall" "$(echo "$u + $s" | bc)"
}
t "matq quantize --layers linear --layout gguf --calib ($tokens)" \
    matq quantize "$hf" -o "$work/ck" --layers linear --layout gguf --calib "$text" --calib-tokens "$tokens" \
    --threads "$threads"
matq="$wall"
grep -E "^calibrate: layer" "$work/log" | sed -n '1p;$p'
t "llama-imatrix ($tokens tokens, chunks of 512)" \
    "$bin/llama-imatrix" -m "$f32" -f "$text" -o "$work/imatrix.gguf" -c 512 --chunks $((tokens / 512)) \
    -t "$threads" -b 512 --no-ppl
imatrix="$wall" all="$wall"
for q in Q4_K_M Q2_K IQ2_M; do
    t "llama-quantize --imatrix $q" "$bin/llama-quantize" --imatrix "$work/imatrix.gguf" "$f32" "$work/$q.gguf" "$q" "$threads"
    all="$(echo "$all + $wall" | bc)"
    [[ "$q" == Q4_K_M ]] && one="$(echo "$imatrix + $wall" | bc)"
done
ratio() { printf '%-62s %7.2fx\n' "$1" "$(echo "scale=4; $matq / $2" | bc)"; }
ratio "matq / (llama-imatrix + llama-quantize Q4_K_M)" "$one"
ratio "matq / (llama-imatrix + all three llama-quantize)" "$all"
