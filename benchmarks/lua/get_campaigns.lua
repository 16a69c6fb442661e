-- GET /campaigns with the Authorization header from $TOKEN.
local token = os.getenv("TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
