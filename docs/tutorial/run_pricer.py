"""Tutorial client: price 200 options on the farm and print the first few."""

from soafarm import BrokerClient, Session, SessionStartInfo

strikes = [80 + i * 0.2 for i in range(200)]

with Session.create(SessionStartInfo("pricer", min_units=1, max_units=4)) as session:
    with BrokerClient(session) as client:
        for i, strike in enumerate(strikes):
            client.send_request("call_price", 100.0, strike, 0.2, 1.0, seed=i, user_data=strike)
        client.end_requests()
        prices = {r.user_data: r.result for r in client.get_responses(timeout=120)}

for strike in strikes[:3]:
    print(f"strike {strike:6.1f}: {prices[strike]:.4f}")
print(f"{len(prices)} options priced in session {session.id}")
