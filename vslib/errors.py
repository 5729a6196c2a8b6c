"""Errors a user can act on. The CLI prints them without a traceback."""


class VisualSearchError(Exception):
    """Base class: the message says what is wrong and what to do."""


class DatasetError(VisualSearchError):
    """The dataset is missing, unreadable or too small."""


class BackboneError(VisualSearchError):
    """A backbone or its weights cannot be loaded."""


class ClassifierError(VisualSearchError):
    """The classifier cannot be trained, loaded or used as configured."""


class IndexBackendError(VisualSearchError):
    """The vector index is unreachable, missing or incompatible."""


