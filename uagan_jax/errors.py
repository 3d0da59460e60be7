"""The one exception type that means "the user's input is wrong", not "the code is wrong".

The command line catches `UserError` and prints its message on one line (no traceback) with a
non-zero exit code. Messages name the file or config key and the problem, e.g.
``/data/case_001/case_001_t2.nii.gz: truncated or corrupt NIfTI (Compressed file ended ...)``.
"""


class UserError(Exception):
  """Bad input from the user: a file, a folder, a config key or a value."""
