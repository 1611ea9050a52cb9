-- Recording events from any language: plain SQL inside the application's own transaction.
--
--   outbox-worker migrate --database-url postgresql://USER@HOST/DB
--   psql "postgresql://USER@HOST/DB" -v ON_ERROR_STOP=1 -f examples/plain_sql.sql
--
-- Each step is what an application in Go, Ruby, Java or PHP does with its own
-- driver: begin, write its business row, write the event with parameters, commit.
-- psql's :'name' stands in for a driver's bound parameter ($1, ?), and \gset for
-- reading a RETURNING value back into the program.

-- The application's own table (here so that the example runs on its own).
CREATE TABLE IF NOT EXISTS invoices (
    id           bigserial PRIMARY KEY,
    email        text NOT NULL,
    amount       numeric(10, 2) NOT NULL,
    paid_at      timestamptz NOT NULL DEFAULT now()
);

-- The parameters the program would bind. properties and eventdata are JSON text:
-- any language's JSON encoder produces them, and the jsonb columns take the text.
\set email 'jane@example.com'
\set amount '42.00'
\set properties '{"FIRSTNAME": "Jane"}'

-- 1. An invoice is paid: the invoice and its event commit together.
BEGIN;

INSERT INTO invoices (email, amount) VALUES (:'email', :'amount')
RETURNING id AS invoice_id
\gset

-- Only email, event, properties and eventdata: every other column has a default
-- (pending, due now). The daemon sends the event once this transaction commits.
INSERT INTO outbox_events (email, event, properties, eventdata)
VALUES (
    :'email',
    'invoice_paid',
    :'properties',
    json_build_object('id', 'invoice:' || :'invoice_id',
                      'data', json_build_object('amount', :'amount'))
);

COMMIT;

-- 2. A payment that is reversed before commit: ROLLBACK takes the invoice and the
-- event with it, so nothing is ever sent for it.
BEGIN;

INSERT INTO invoices (email, amount) VALUES ('joe@example.com', '13.00')
RETURNING id AS reversed_invoice_id
\gset

INSERT INTO outbox_events (email, event, eventdata)
VALUES ('joe@example.com', 'invoice_paid',
        json_build_object('id', 'invoice:' || :'reversed_invoice_id'));

ROLLBACK;

-- What is waiting to be delivered.
SELECT id, email, event, status, next_attempt_at
FROM outbox_events WHERE status = 'pending' ORDER BY id;
