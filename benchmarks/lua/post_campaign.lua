-- POST /campaigns with a JSON body and the Authorization header from $TOKEN.
wrk.method = "POST"
wrk.body = '{"name": "benchmark campaign", "description": "created by wrk"}'
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
