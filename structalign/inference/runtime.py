"""ONNX Runtime on the CPU for the face detector and the landmark model: one session policy for both.

Threads: `threads` intra-op threads (0 = ONNX Runtime's default, one per core). Waiting: by default ONNX Runtime's
idle workers spin for milliseconds, after each operator and after each run. On a photo or a video frame the video
decoder, the detector, the crops and the model follow one another, so a pool left spinning takes the cores the next
step needs, and on a machine shared with other work its workers take the time slices of their own session's main
thread. Here a worker spins at most SPIN_MICROSECONDS for the next operator's work, then sleeps, and no worker spins
once a run has ended. Measured with benchmarks/predict.py's picture and clip (demo model, 2 threads on 2 cores):
idle, one forward is as fast as with ONNX Runtime's default spinning (never spinning is 20 % slower) and a photo to
landmarks ~20 % faster; with another process busy on one core, photo and video are 1.3-1.5 x faster than with the
default and about as fast as never spinning. An older onnxruntime without the spin-duration setting ignores it and
only stops its workers spinning between runs.
"""
SPIN_MICROSECONDS = 20


def cpu_session_options(threads: int = 0):
    """onnxruntime.SessionOptions for a CPU session: `threads` intra-op threads, workers that spin at most
    SPIN_MICROSECONDS before sleeping and not at all between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_MICROSECONDS))
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options
