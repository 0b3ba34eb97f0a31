"""fedseg ClientApp: the hospital side of the federation.

Kept thin and cheap to import; the work lives in :mod:`client.runtime.handlers`.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from shared.cli import quiet_optional_codec_notice
from shared.protocol import FINGERPRINT_ACTION

quiet_optional_codec_notice()  # else every case read logs a notice (in a simulation, relayed by Ray and Flower)
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's data."""
    from client.runtime.handlers import handle_train
    from client.runtime.memory import memory_released

    with memory_released():
        return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's validation split."""
    from client.runtime.handlers import handle_evaluate
    from client.runtime.memory import memory_released

    with memory_released():
        return handle_evaluate(msg, context)


@app.query(FINGERPRINT_ACTION)
def fingerprint(msg: Message, context: Context) -> Message:
    """Send this site's data fingerprint (aggregates only) for the federated plan."""
    from client.runtime.handlers import handle_fingerprint
    from client.runtime.memory import memory_released

    with memory_released():
        return handle_fingerprint(msg, context)
