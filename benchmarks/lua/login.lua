-- POST /login with the credentials of the benchmark user.
wrk.method = "POST"
wrk.body = '{"tenant_id": "bench", "email": "bench@example.com", "password": "correct horse battery staple"}'
wrk.headers["Content-Type"] = "application/json"
