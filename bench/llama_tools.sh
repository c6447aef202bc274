#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix, llama-quantize and llama-perplexity from the llama.cpp that the
# pinned llama-cpp-python sdist vendors, with the portable flags of .ci/run (no -march=native), and
# cache them like the wheel: ~/.cache/matq/llama-tools/llama.cpp-<llama-cpp-python version>-<key>/,
# key = sha256 of the machine and the CMake flags. Prints the bin directory on stdout (the only
# thing on stdout). About 10 minutes of 2 cores the first time; nothing after.
#   bench/llama_tools.sh [SDIST]     SDIST: a llama_cpp_python-<ver>.tar.gz (else pip downloads it)
set -euo pipefail
LLAMA_CPP_PYTHON="${LLAMA_CPP_PYTHON:-0.3.36}"
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON"
LLAMA_CMAKE_ARGS+=" -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF"
LLAMA_CMAKE_ARGS+=" -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
LLAMA_CMAKE_ARGS+=" -DGGML_AMX_BF16=OFF -DGGML_CPU_ALL_VARIANTS=OFF"
# the tools only: static, no curl, no tests/examples/server
TOOL_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF"
TOOL_CMAKE_ARGS+=" -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON"
TARGETS=(llama-imatrix llama-quantize llama-perplexity)
key="$(printf '%s %s %s' "$(uname -m)" "$LLAMA_CMAKE_ARGS" "$TOOL_CMAKE_ARGS" | sha256sum | cut -c1-12)"
out="${XDG_CACHE_HOME:-$HOME/.cache}/matq/llama-tools/llama.cpp-$LLAMA_CPP_PYTHON-$key"
if [[ -x "$out/bin/llama-perplexity" && -x "$out/bin/llama-quantize" && -x "$out/bin/llama-imatrix" ]]; then
    echo "$out/bin"; exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sdist="${1:-}"
if [[ -z "$sdist" ]]; then
    python3 -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$LLAMA_CPP_PYTHON" >&2
    sdist="$(ls "$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON".tar.gz)"
fi
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
start=$SECONDS
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" -G Ninja $LLAMA_CMAKE_ARGS $TOOL_CMAKE_ARGS >&2
cmake --build "$work/build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" --target "${TARGETS[@]}" >&2
rm -rf "$out.tmp"; mkdir -p "$out.tmp/bin"
for t in "${TARGETS[@]}"; do cp "$work/build/bin/$t" "$out.tmp/bin/"; done
printf 'llama-cpp-python %s\nflags %s %s\nbuild_seconds %d\n' "$LLAMA_CPP_PYTHON" "$LLAMA_CMAKE_ARGS" \
    "$TOOL_CMAKE_ARGS" "$((SECONDS - start))" > "$out.tmp/BUILD"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "built in $((SECONDS - start)) s: $out/bin" >&2
echo "$out/bin"
