#!/usr/bin/env bash
# Refresh the images the README shows; they live in docs/img/ (bench/results/ is not in git).
#
#   scripts/readme-images.sh bench MIXED_RUN AUTOSCALE_RUN
#       copy the plots of two `python -m bench run` results folders: latency-mixed.png from the
#       mixed-workload run, timeline-io_spiky.png and timeline-ramp.png from the autoscaling run
#       (the README's "Reproduce" line has both commands)
#   scripts/readme-images.sh flower
#       re-take the screenshot of Flower's worker page (a real worker and Flower on a private
#       Redis, headless Chromium; needs `apt-get install chromium` or a chromium on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=docs/img
case "${1:-}" in
  bench)
    [ $# -eq 3 ] || { echo "usage: $0 bench MIXED_RUN AUTOSCALE_RUN" >&2; exit 2; }
    cp "$2/plots/latency-mixed.png" "$IMG/latency-mixed.png"
    cp "$3/plots/timeline-io_spiky.png" "$IMG/timeline-io_spiky.png"
    cp "$3/plots/timeline-ramp.png" "$IMG/timeline-ramp.png"
    echo "copied 3 plots into $IMG; update the run names in README.md's captions"
    ;;
  flower)
    before=$(stat -c %Y "$IMG/flower-autoscaler.png" 2>/dev/null || echo 0)
    ADAPTIVE_SCREENSHOT_DIR="$PWD/$IMG" .venv/bin/python -m pytest -q -rs \
      tests/integration/test_metrics.py -k test_flower_worker_page_screenshot
    after=$(stat -c %Y "$IMG/flower-autoscaler.png" 2>/dev/null || echo 0)
    [ "$after" != "$before" ] || { echo "no new screenshot (is chromium installed?)" >&2; exit 1; }
    echo "wrote $IMG/flower-autoscaler.png"
    ;;
  *)
    echo "usage: $0 bench MIXED_RUN AUTOSCALE_RUN | flower" >&2
    exit 2
    ;;
esac
