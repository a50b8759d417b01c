"""User errors: the one family of exceptions the CLI turns into a one-line
message and exit code 2. Anything else that raises is a bug (exit code 1)."""


class OTCompressError(Exception):
    """Base of every error a user can cause and fix."""

    exit_code = 2


class IncompatibleModelsError(OTCompressError):
    """Anchor and parents cannot be fused (depth, type, vocabulary, image size...)."""


class UnreachableShapeError(IncompatibleModelsError):
    """One alignment cannot map these parents onto these widths (pruning keeps
    whole key/value groups); another may (folding): the race skips that start."""


class UnsupportedArchitectureError(OTCompressError):
    """No architecture description for this model type/class."""


class InvalidOptionError(OTCompressError):
    """An option value or combination of options is not valid."""


class DivergedError(InvalidOptionError):
    """The training loss became NaN/Inf after updates at this lr (a lower lr may not)."""


class ModelLoadError(OTCompressError):
    """A model path is missing, not a model, corrupt, or not reachable offline."""


class DataError(OTCompressError):
    """A data spec cannot be read or does not fit the model."""


class SolverError(OTCompressError):
    """A transport solver did not converge (names the layer and regulariser)."""


class ValidationGateError(OTCompressError):
    """A validation gate failed (ONNX parity beyond tolerance, accuracy floor)."""

    exit_code = 3
