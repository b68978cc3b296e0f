"""Runs a command and kills it (SIGKILL) while it writes the backup of an epoch.

    python -m tests.torn_backup EPOCH BACKUP_DIR MODULE [FLAGS...]

runs ``python -m MODULE FLAGS...``; the EPOCH-th weights file written into
BACKUP_DIR is cut to 96 bytes (a truncated HDF5 file, as a kill in the middle
of the write leaves it) and the process is killed on the spot.
"""

import os
import runpy
import signal
import sys

import keras

epoch, backup, module = int(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3]
save_weights = keras.Model.save_weights
written = 0


def torn(self, filepath, *args, **kwargs):
    global written
    save_weights(self, filepath, *args, **kwargs)
    if os.path.dirname(os.path.abspath(str(filepath))) == backup:
        written += 1
        if written == epoch:
            with open(filepath, "r+b") as f:
                f.truncate(96)
            os.kill(os.getpid(), signal.SIGKILL)


keras.Model.save_weights = torn
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
