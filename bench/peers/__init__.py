"""`python -m bench.peers [--quick] [--repeat N]`: imgq beside its peers on the same URLs, the same model and the
same cores.

Rows, each in its own subprocess (no shared imports or threads) with a time bound:

    ceiling       the JPEG bytes already in RAM: draft decode + preprocess + forward, as a worker does it
    daft          Daft: col("url").url.download(), then a Pillow draft-mode batch UDF (a @daft.cls) + the model
    imgq run      `imgq run`, the embedded default (private Redis and worker): whole command, and its own
                  submit-to-last-result rate
    imgq cluster  a warm `imgq worker`: submit to last result in process, and `imgq submit --wait` as a command
    tutorial      the tutorial's loop: urllib, Pillow, one image at a time through the model

The job: 600 photo-like JPEGs (bench.images: 640x480 to 1600x1200, 84-556 KB, 288 KB on average; the issue's
job had ~155 KiB) each fetched 10 times, 6,000 URLs (--quick: 60 images, 600 URLs) over HTTP/1.0 from
Python's http.server on 127.0.0.1; 64 px input; one TorchScript file (imgq's default CNN, untrained: speed
does not depend on what it learnt) that imgq serves after `imgq models add` and the others load with
torch.jit.load. Daft's telemetry is off (DO_NOT_TRACK=1, SCARF_NO_ANALYTICS=true, DAFT_ANALYTICS_ENABLED=0,
set before it is imported, in every process).

The rows run in rounds (--repeat, 3 by default; the tutorial once): this VM's speed drifts by tens of percent
within minutes, so each row's figure is its median round, and imgq's ratio to Daft is also given round by
round (two rows side by side in one round meet the same machine). The bound (bench.ceiling.bound_ips) is
every core busy with the ceiling's CPU per image plus the image server's per request.
"""

import os

# Before anything can import daft, here and in every child (children inherit os.environ).
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "SCARF_NO_ANALYTICS": "true", "DAFT_ANALYTICS_ENABLED": "0"}
os.environ.update(TELEMETRY_OFF)
