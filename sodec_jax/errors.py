"""The one exception type users see."""


class SodecError(Exception):
  """A problem the user can act on (bad file, bad image, missing weights, wrong config).

  The message says what is wrong and how to fix it; the CLI prints it on one line and exits 1.
  """
