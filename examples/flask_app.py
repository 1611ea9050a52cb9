"""A minimal Flask shop: an order and its `order_completed` event commit together, or neither does.

    export SHOP_DATABASE_URL=sqlite:///$PWD/shop.db  # or postgresql+psycopg://user@host/shop
    .venv/bin/outbox-worker migrate --database-url "$SHOP_DATABASE_URL"
    .venv/bin/flask --app examples/flask_app.py run
    curl -X POST localhost:5000/orders -H 'content-type: application/json' \
         -d '{"email": "jane@example.com", "product": "Wrist watch", "price": "50.00"}'

`.venv/bin/outbox-worker run` (with OUTBOX_DATABASE_URL set to the same database) delivers
the event. Installed by `.venv/bin/pip install -e '.[examples]'` (see examples/README.md).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker import InvalidEvent, track_event


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):
    __tablename__ = "shop_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    product: Mapped[str]
    price: Mapped[str]  # as the shop shows it, e.g. "50.00"


class PaymentDeclined(Exception):
    """The payment provider refused the charge."""


def charge(payment_token: str, price: str) -> None:
    """A stand-in for a payment provider: the token "tok_declined" is refused."""
    if payment_token == "tok_declined":
        raise PaymentDeclined(f"the card was declined for {price}")


def create_order() -> Any:
    body = request.get_json(force=True)
    try:
        order = Order(email=body["email"], product=body["product"], price=body["price"])
        db.session.add(order)
        db.session.flush()  # the order's id, for the event
        outbox_id = track_event(
            # This request's session: its transaction is committed below or rolled back.
            db.session,
            email=order.email,
            event="order_completed",
            properties={"FIRSTNAME": body["first_name"]} if "first_name" in body else None,
            eventdata={
                "id": f"order:{order.id}",
                "data": {"price": order.price, "product": order.product},
            },
        )
        # Anything that fails from here on takes the order *and* its event with it.
        charge(body.get("payment_token", "tok_visa"), order.price)
        db.session.commit()
    except InvalidEvent as exc:
        db.session.rollback()
        return jsonify(error=str(exc), field=exc.field), 422
    except PaymentDeclined as exc:
        db.session.rollback()
        return jsonify(error=str(exc)), 402
    return jsonify(order_id=order.id, outbox_id=outbox_id), 201


def create_app(database_url: str | None = None) -> Flask:
    """The app, on SHOP_DATABASE_URL unless a URL is given; its orders table is created here,
    the outbox tables by `outbox-worker migrate`."""
    app = Flask(__name__)
    # Flask-SQLAlchemy reads a relative SQLite path from the instance folder, the
    # daemon from its working directory: an absolute default keeps them on one file.
    default = f"sqlite:///{os.path.abspath('shop.db')}"
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url or os.environ.get(
        "SHOP_DATABASE_URL", default
    )
    db.init_app(app)
    with app.app_context():
        db.create_all()
    app.add_url_rule("/orders", view_func=create_order, methods=["POST"])
    return app
