"""Every error the project raises on purpose: one base, so each entry point turns any of them
into one line on stderr (crackcore.cli). Each message names the problem and the fix."""


class CrackError(Exception):
    """Base of every project error."""


class ConfigError(CrackError, ValueError):
    """A configuration value is out of range or unknown."""


class DataError(CrackError):
    """The data cannot be used as given."""


class WeightsError(CrackError):
    """ImageNet weights were required but cannot be had, or a given file is wrong."""


class DownloadError(CrackError):
    """The dataset could not be fetched, verified or extracted."""


class ModelFileError(CrackError):
    """A model file is missing or not one of ours, or predict's flags cannot be used."""


class StudyFilesError(CrackError):
    """A folder is not a study, or one of its files is damaged."""


class StudyError(CrackError):
    """The study cannot start or go on."""


class CheckpointError(CrackError):
    """A checkpoint cannot resume this run (another freeze depth or model)."""


class DivergedError(CrackError, FloatingPointError):
    """The training loss turned non-finite (a FloatingPointError, as torch's anomaly checks are)."""
